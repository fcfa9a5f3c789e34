"""Peak memory of the logits part of every method's step, against one model's fp32 [B, T, V] logits.

The logits part is everything a step does after the models' last hidden states: both LM heads, the loss and its
backward to the student's hidden states. Each method runs the pipeline's own loss functions on random hidden states
(width --width; the memory of the part hardly depends on it) and bias-free heads, at each vocabulary of --vocabs:
    minillm   losses.fused_head_reverse_kl (the single-step term) + minillm_loss.policy_loss (PPO term), as
              minillm.surrogate_sums: T = the response
    opd       the same call (OPD runs MiniLLM's recipe) with the PPO term alone in the loss (kl_grad False)
    gkd       losses.fused_head_divergence("jsd", params.yaml's beta), as student_data.divergence_sums
    distillm  losses.fused_head_divergence with params.yaml's divergence and alpha
    kd        sft.response_token_loss_parts with a KD term (CE + params.yaml's divergence, both heads fused through
              losses.fused_head_kd) over the whole sequence the KD batch forwards, prompt + response; and, for comparison,
              KD's logits part as it was before that fusion (both models' full logits, F.cross_entropy, divergence)
The reference is one model's fp32 logits over the T the method's heads cover: [B, R, V] for the on-policy methods,
[B, P + R - 1, V] for KD (the positions that predict a next token). Target (issue 17): <= 1.5x, at GPT-2's
vocabulary and at Llama-3's 128K.

    .venv/bin/python -m benchmarks.bench_logits          # ~1 min on 2 cores
"""

import argparse
import types

import torch
import torch.nn.functional as F
import yaml

from benchmarks.common import MIB, print_table, tensor_peak
from pipeline import losses
from pipeline.config import KDMethod
from pipeline.hidden_states import FUSED_CHUNK
from pipeline.minillm_loss import policy_loss
from pipeline.sft import KDTerm, response_token_loss_parts

TARGET = 1.5


class HiddenStatesOnly(torch.nn.Module):
    """A model stand-in for KD's step: its forward returns given last hidden states and its LM head is a given
    weight, so that sft.response_token_loss_parts runs only the logits part (the weight needs no gradient: the
    part's memory is that of the logits, not of a [V, d] gradient)."""

    def __init__(self, hidden: torch.Tensor, head: torch.Tensor):
        super().__init__()
        self.hidden = hidden
        self.head = types.SimpleNamespace(weight=head, bias=None)

    def forward(self, input_ids, attention_mask, output_hidden_states, logits_to_keep):
        return types.SimpleNamespace(hidden_states=(self.hidden,))

    def get_output_embeddings(self):
        return self.head


def measure(args, vocab: int, params: dict) -> list[list]:
    torch.manual_seed(0)
    batch, prompt, response, width = args.batch, args.prompt_len, args.response_len, args.width
    student_head, teacher_head = torch.randn(vocab, width) * 0.02, torch.randn(vocab, width) * 0.02
    tokens = torch.randint(vocab, (batch, response))
    mask = torch.ones(batch, response)
    student_hidden = torch.randn(batch, response, width, requires_grad=True)
    teacher_hidden = torch.randn(batch, response, width)
    old_logprobs, advantages = torch.full((batch, response), -float(torch.log(torch.tensor(vocab)))), torch.randn(batch, response)

    def minillm(ppo_only: bool):
        def run():
            student_hidden.grad = None
            logp, single, _ = losses.fused_head_reverse_kl(student_hidden, student_head, teacher_hidden, teacher_head,
                                                           tokens, mask, kl_grad=not ppo_only, chunk_size=FUSED_CHUNK)
            long, _ = policy_loss(logp, old_logprobs, advantages, mask, mask, 0.2)
            (long if ppo_only else single + long).backward()
        return run

    def fused_divergence(name: str, beta: float, alpha: float):
        def run():
            student_hidden.grad = None
            sums = losses.fused_head_divergence(name, student_hidden, student_head, teacher_hidden, teacher_head, tokens,
                                                mask, beta=beta, alpha=alpha, chunk_size=FUSED_CHUNK)
            sums["divergence"].backward()
        return run

    sequence = prompt + response
    kd_config = KDMethod.model_validate(params["kd"])
    kd_student_hidden = torch.randn(batch, sequence, width, requires_grad=True)
    kd_teacher_hidden = torch.randn(batch, sequence, width)
    kd_teacher = HiddenStatesOnly(kd_teacher_hidden, teacher_head)
    kd_student = HiddenStatesOnly(kd_student_hidden, student_head)
    labels = torch.randint(vocab, (batch, sequence))
    labels[:, :prompt] = -100
    kd_batch = {"input_ids": labels.clamp(min=0), "attention_mask": torch.ones(batch, sequence, dtype=torch.long),
                "labels": labels}
    kd_term = KDTerm(teacher=kd_teacher, divergence=kd_config.divergence, ratio=kd_config.ratio, beta=kd_config.beta,
                     alpha=kd_config.alpha)

    def kd():
        kd_student_hidden.grad = None
        parts, _ = response_token_loss_parts(kd_student, kd_batch, kd_term)
        ((1 - kd_term.ratio) * parts["ce"] + kd_term.ratio * parts["kd"]).backward()

    def kd_full_logits():  # KD's logits part before losses.fused_head_kd: both models' [B, T, V] logits
        kd_student_hidden.grad = None
        logits = F.linear(kd_student_hidden, student_head)[:, :-1]
        teacher_logits = F.linear(kd_teacher_hidden, teacher_head)[:, :-1]
        targets = labels[:, 1:]
        ce = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=-100, reduction="sum")
        divergence = losses.divergence(kd_term.divergence, logits, teacher_logits, targets != -100, beta=kd_term.beta,
                                       alpha=kd_term.alpha, reduction="sum")
        ((1 - kd_term.ratio) * ce + kd_term.ratio * divergence).backward()

    runs = [
        ("minillm", minillm(False), response),
        ("opd", minillm(True), response),
        ("gkd", fused_divergence("jsd", params["gkd"]["beta"], 0.1), response),
        ("distillm", fused_divergence(params["distillm"]["divergence"], 0.5, params["distillm"]["alpha"]), response),
        ("kd", kd, sequence - 1),
        ("kd, full logits (before fusion)", kd_full_logits, sequence - 1),
    ]
    rows = []
    for name, run, positions in runs:
        run()  # warm-up: lazily allocated workspaces are not the part's
        peak, _ = tensor_peak(run, torch.device("cpu"))
        reference = batch * positions * vocab * 4
        ratio = peak / reference
        rows.append([name, vocab, f"{batch} x {positions}", reference / MIB, peak / MIB, ratio,
                     "met" if ratio <= TARGET else "missed"])
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vocabs", type=int, nargs="+", default=[50257, 128256])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--response-len", type=int, default=64)
    parser.add_argument("--width", type=int, default=64, help="hidden size of the stand-in hidden states")
    args = parser.parse_args()
    params = yaml.safe_load(open("params.yaml"))["distill"]
    rows = [row for vocab in args.vocabs for row in measure(args, vocab, params)]
    print(f"fused chunk {FUSED_CHUNK} positions, fp32, width {args.width}, prompt {args.prompt_len}, response "
          f"{args.response_len}; peak: tensors the part allocates above those held before it (forward + backward)")
    print_table(["method", "vocab", "B x T", "fp32 [B,T,V] MiB", "logits part peak MiB", "ratio", f"<= {TARGET}"], rows)


if __name__ == "__main__":
    main()
