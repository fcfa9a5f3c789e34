"""losses.fused_head_reverse_kl (LM heads fused into chunked, recomputed reverse KL) against the plain computation
on materialised logits, in float64, and against the pure-Python brute force of test_losses."""

import pytest
import torch

from pipeline.losses import fused_head_reverse_kl
from tests.test_losses import _softmax, brute_reverse_kl

VOCAB, WIDTH = 23, 6


def batch(seed: int):
    generator = torch.Generator().manual_seed(seed)
    student_hidden = torch.randn(3, 7, WIDTH, generator=generator, dtype=torch.float64)
    teacher_hidden = torch.randn(3, 7, 2 * WIDTH, generator=generator, dtype=torch.float64)
    student_head = torch.randn(VOCAB, WIDTH, generator=generator, dtype=torch.float64)
    teacher_head = torch.randn(VOCAB, 2 * WIDTH, generator=generator, dtype=torch.float64)
    tokens = torch.randint(0, VOCAB, (3, 7), generator=generator)
    mask = torch.ones(3, 7)
    mask[0, 5:] = 0
    mask[2, 1:] = 0
    weights = torch.rand(3, 7, generator=generator, dtype=torch.float64) + 0.5
    weights[mask == 0] = float("inf")  # padding weights may be anything; they must not leak in
    return student_hidden, student_head, teacher_hidden, teacher_head, tokens, mask, weights


def plain(student_hidden, student_head, teacher_hidden, teacher_head, tokens, mask, weights):
    log_q = torch.log_softmax(student_hidden @ student_head.T, -1)
    log_p = torch.log_softmax(teacher_hidden @ teacher_head.T, -1)
    token_logprobs = log_q.gather(-1, tokens[..., None]).squeeze(-1)
    kl = (log_q.exp() * (log_q - log_p)).sum(-1)
    entropy = -(log_q.exp() * log_q).sum(-1)
    kl_sum = (kl * torch.where(mask > 0, weights, 0.0)).sum()
    return token_logprobs, kl_sum, (entropy * mask).sum()


@pytest.mark.parametrize("chunk_size", [1, 3, 7, 64])
def test_values_and_gradients_equal_the_plain_computation(chunk_size):
    inputs = batch(seed=chunk_size)
    student_hidden, student_head = (tensor.clone().requires_grad_(True) for tensor in inputs[:2])
    expected_hidden, expected_head = (tensor.clone().requires_grad_(True) for tensor in inputs[:2])
    logprobs, kl_sum, entropy_sum = fused_head_reverse_kl(
        student_hidden, student_head, *inputs[2:6], weights=inputs[6], chunk_size=chunk_size
    )
    expected_logprobs, expected_kl, expected_entropy = plain(expected_hidden, expected_head, *inputs[2:])
    torch.testing.assert_close(logprobs.double(), expected_logprobs, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(kl_sum.double(), expected_kl, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(torch.as_tensor(entropy_sum).double(), expected_entropy, atol=1e-5, rtol=1e-5)
    # One loss mixing both differentiable outputs, as MiniLLM's single-step + PPO terms do.
    coefficients = torch.linspace(-1, 1, 21, dtype=torch.float64).view(3, 7)
    ((logprobs * coefficients * inputs[5]).sum() + kl_sum).backward()
    ((expected_logprobs * coefficients * inputs[5]).sum() + expected_kl).backward()
    torch.testing.assert_close(student_hidden.grad, expected_hidden.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(student_head.grad, expected_head.grad, atol=1e-5, rtol=1e-5)


def test_kl_matches_the_pure_python_brute_force():
    student_hidden, student_head, teacher_hidden, teacher_head, tokens, mask, _ = batch(seed=5)
    _, kl_sum, _ = fused_head_reverse_kl(
        student_hidden, student_head, teacher_hidden, teacher_head, tokens, mask, chunk_size=2
    )
    student_logits = (student_hidden @ student_head.T).tolist()
    teacher_logits = (teacher_hidden @ teacher_head.T).tolist()
    brute = sum(
        brute_reverse_kl(_softmax(teacher_logits[b][t]), _softmax(student_logits[b][t]))
        for b in range(3) for t in range(7) if mask[b, t] > 0
    )
    assert float(kl_sum) == pytest.approx(brute, rel=1e-6)


def test_teacher_is_a_constant_and_no_vocabulary_tensor_is_saved_for_backward():
    student_hidden, student_head, teacher_hidden, teacher_head, tokens, mask, weights = batch(seed=9)
    tensors = [
        tensor.float().requires_grad_(True) for tensor in (student_hidden, student_head, teacher_hidden, teacher_head)
    ]
    saved: list[torch.Tensor] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda tensor: saved.append(tensor) or tensor, lambda tensor: tensor):
        logprobs, kl_sum, _ = fused_head_reverse_kl(*tensors, tokens, mask, weights=weights.float(), chunk_size=3)
    # Only chunk inputs are kept; the head weights [V, d] are parameters, not logits.
    assert not [tensor for tensor in saved if tensor.dim() == 3 and tensor.shape[-1] == VOCAB]
    (logprobs.sum() + kl_sum).backward()
    assert tensors[0].grad is not None and tensors[1].grad is not None
    assert tensors[2].grad is None and tensors[3].grad is None


def test_mismatched_shapes_are_errors():
    student_hidden, student_head, teacher_hidden, teacher_head, tokens, mask, _ = batch(seed=1)
    with pytest.raises(ValueError, match="must agree on"):
        fused_head_reverse_kl(student_hidden, student_head, teacher_hidden[:, :5], teacher_head, tokens, mask)
    with pytest.raises(ValueError, match="one tokenizer"):
        fused_head_reverse_kl(student_hidden, student_head, teacher_hidden, teacher_head[:5], tokens, mask)


def trl_generalized_jsd(student_logits, teacher_logits, mask, beta: float, temperature: float) -> torch.Tensor:
    """TRL GKDTrainer's generalized_jsd_loss, re-derived from its definition (F.kl_div with log targets, the
    mixture by logsumexp, beta = 0 and 1 special-cased, "batchmean" over the masked tokens), as the reference."""
    import math

    import torch.nn.functional as F

    student = F.log_softmax(student_logits / temperature, dim=-1)
    teacher = F.log_softmax(teacher_logits / temperature, dim=-1)
    if beta == 0:
        jsd = F.kl_div(student, teacher, reduction="none", log_target=True)
    elif beta == 1:
        jsd = F.kl_div(teacher, student, reduction="none", log_target=True)
    else:
        mixture = torch.logsumexp(torch.stack([student + math.log(1 - beta), teacher + math.log(beta)]), dim=0)
        jsd = beta * F.kl_div(mixture, teacher, reduction="none", log_target=True) + (1 - beta) * F.kl_div(
            mixture, student, reduction="none", log_target=True)
    return jsd[mask > 0].sum() / mask.sum()


@pytest.mark.parametrize("beta", [0.0, 0.1, 0.5, 0.9, 1.0])
@pytest.mark.parametrize("temperature", [1.0, 0.9, 2.0])
def test_fused_jsd_equals_trls_generalized_jsd(beta, temperature):
    """GKD's loss through the fused heads, on the same logits, equals TRL's, its temperature and beta ends included."""
    from pipeline.losses import fused_head_divergence

    student_hidden, student_head, teacher_hidden, teacher_head, tokens, mask, _ = batch(seed=5)
    sums = fused_head_divergence("jsd", student_hidden, student_head, teacher_hidden, teacher_head, tokens, mask,
                                 beta=beta, temperature=temperature, chunk_size=3)
    reference = trl_generalized_jsd(student_hidden @ student_head.T, teacher_hidden @ teacher_head.T, mask, beta, temperature)
    assert sums["divergence"].dtype == torch.float64  # float64 inputs stay float64
    torch.testing.assert_close(sums["divergence"] / mask.sum(), reference, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name", ["skew_forward_kl", "skew_reverse_kl", "forward_kl", "reverse_kl", "tvd"])
@pytest.mark.parametrize("chunk_size", [1, 4, 64])
def test_fused_divergence_equals_the_plain_one_in_value_and_gradient(name, chunk_size):
    from pipeline import losses

    student_hidden, student_head, teacher_hidden, teacher_head, tokens, mask, _ = batch(seed=chunk_size)
    fused_inputs = [t.clone().requires_grad_() for t in (student_hidden, student_head)]
    plain_inputs = [t.clone().requires_grad_() for t in (student_hidden, student_head)]
    sums = losses.fused_head_divergence(name, *fused_inputs, teacher_hidden, teacher_head, tokens, mask, alpha=0.1,
                                        temperature=1.5, chunk_size=chunk_size)
    student_logits = (plain_inputs[0] @ plain_inputs[1].T) / 1.5
    teacher_logits = (teacher_hidden @ teacher_head.T) / 1.5
    plain_sum = losses.divergence(name, student_logits, teacher_logits, mask, alpha=0.1, reduction="sum")
    torch.testing.assert_close(sums["divergence"], plain_sum)
    # The diagnostics: the reverse KL, and the log-ratio of the given tokens.
    torch.testing.assert_close(sums["reverse_kl"], losses.reverse_kl(student_logits, teacher_logits, mask, reduction="sum"))
    log_ratio = (teacher_logits.log_softmax(-1) - student_logits.log_softmax(-1)).gather(-1, tokens[..., None]).squeeze(-1)
    torch.testing.assert_close(sums["log_ratio"], (log_ratio * mask).sum().detach())
    sums["divergence"].backward()
    plain_sum.backward()
    for fused, plain_input in zip(fused_inputs, plain_inputs):
        torch.testing.assert_close(fused.grad, plain_input.grad)


@pytest.mark.parametrize("name", ["teacher_cross_entropy", "forward_kl", "jsd", "skew_reverse_kl"])
@pytest.mark.parametrize("chunk_size", [1, 2, 64])
def test_fused_kd_equals_cross_entropy_and_the_plain_divergence_in_value_and_gradient(name, chunk_size):
    """fused_head_kd against F.cross_entropy and losses.divergence on materialised logits; the first two positions
    are unmasked everywhere (a prompt block), so chunk size 2 skips a chunk, and their targets are -100."""
    import torch.nn.functional as F

    from pipeline import losses

    student_hidden, student_head, teacher_hidden, teacher_head, targets, mask, _ = batch(seed=chunk_size)
    mask[:, :2] = 0
    targets = torch.where(mask > 0, targets, -100)
    fused_inputs = [t.clone().requires_grad_() for t in (student_hidden, student_head)]
    plain_inputs = [t.clone().requires_grad_() for t in (student_hidden, student_head)]
    sums = losses.fused_head_kd(name, *fused_inputs, teacher_hidden, teacher_head, targets, mask, beta=0.3, alpha=0.2,
                                chunk_size=chunk_size)
    student_logits = plain_inputs[0] @ plain_inputs[1].T
    teacher_logits = teacher_hidden @ teacher_head.T
    plain_ce = F.cross_entropy(student_logits.flatten(0, 1), targets.flatten(), ignore_index=-100, reduction="sum")
    plain_divergence = losses.divergence(name, student_logits, teacher_logits, mask, beta=0.3, alpha=0.2, reduction="sum")
    torch.testing.assert_close(sums["ce"], plain_ce)
    torch.testing.assert_close(sums["divergence"], plain_divergence)
    (0.4 * sums["ce"] + 0.6 * sums["divergence"]).backward()
    (0.4 * plain_ce + 0.6 * plain_divergence).backward()
    for fused, plain_input in zip(fused_inputs, plain_inputs):
        torch.testing.assert_close(fused.grad, plain_input.grad)
