"""Is the policy gradient an unbiased estimate of the gradient of the sequence-level reverse KL?

The toy: a 3-symbol vocabulary, responses of exactly 2 tokens, a tabular student q_theta (logits for y1 and for y2
given y1) and a fixed tabular teacher p. Enumerating the 9 sequences gives the exact gradient of
KL(q || p) = sum_y q(y) [log q(y) - log p(y)]. The estimators are the pipeline's own pieces (minillm_loss, losses),
applied to rollouts drawn from the sampling policy, as train_minillm applies them:

    OPD        policy_loss with A_t = sum_{t' >= t} discount^(t' - t) r_t'          (OPDMethod.as_policy_gradient)
    MiniLLM    L_single (exact per-token reverse KL, weighted by w_t) + policy_loss with A_t the future rewards

Averaged over N rollouts, an unbiased estimator's error shrinks like 1/sqrt(N); a biased one's levels off at its
bias. `python -m tests.test_estimators` prints the bias of the common settings.
"""

import math

import pytest
import torch

from pipeline import losses
from pipeline.config import OPDMethod, Optimizer
from pipeline.minillm_loss import advantages, importance_weights, per_token_rewards, policy_loss

VOCAB = 3


def toy():
    generator = torch.Generator().manual_seed(0)
    student = (torch.randn(VOCAB, generator=generator), torch.randn(VOCAB, VOCAB, generator=generator))
    teacher = (torch.randn(VOCAB, generator=generator) * 2, torch.randn(VOCAB, VOCAB, generator=generator) * 2)
    return student, teacher


def exact_gradient(student, teacher) -> torch.Tensor:
    theta1, theta2 = (t.clone().requires_grad_() for t in student)
    log_q1, log_q2 = theta1.log_softmax(-1), theta2.log_softmax(-1)
    log_p1, log_p2 = teacher[0].log_softmax(-1), teacher[1].log_softmax(-1)
    log_q = log_q1[:, None] + log_q2  # [y1, y2]
    log_p = log_p1[:, None] + log_p2
    kl = (log_q.exp() * (log_q - log_p)).sum()
    return torch.cat([g.flatten() for g in torch.autograd.grad(kl, (theta1, theta2))])


def estimated_gradient(student, teacher, rollouts: int, method: str, *, teacher_mix=0.0, discount=1.0,
                       length_normalized=False, whiten=False, clip_eps=1e9, seed=1) -> torch.Tensor:
    """The gradient of the method's loss, averaged over `rollouts` sequences drawn from alpha p + (1 - alpha) q."""
    theta1, theta2 = (t.clone().requires_grad_() for t in student)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        mix1 = teacher_mix * teacher[0].softmax(-1) + (1 - teacher_mix) * theta1.softmax(-1)
        y1 = torch.multinomial(mix1.expand(rollouts, VOCAB), 1, generator=generator).squeeze(1)
        mix2 = teacher_mix * teacher[1].softmax(-1)[y1] + (1 - teacher_mix) * theta2.softmax(-1)[y1]
        y2 = torch.multinomial(mix2, 1, generator=generator).squeeze(1)
    tokens = torch.stack([y1, y2], dim=1)
    student_logits = torch.stack([theta1.expand(rollouts, VOCAB), theta2[y1]], dim=1)  # [N, 2, V]
    teacher_logits = torch.stack([teacher[0].expand(rollouts, VOCAB), teacher[1][y1]], dim=1)
    logp_new = student_logits.log_softmax(-1).gather(-1, tokens[..., None]).squeeze(-1)
    logp_old = logp_new.detach()
    logp_teacher = teacher_logits.log_softmax(-1).gather(-1, tokens[..., None]).squeeze(-1)
    mask = torch.ones(rollouts, 2)
    weights = importance_weights(logp_old, logp_teacher, teacher_mix, None)
    rewards = per_token_rewards(logp_teacher, logp_old, mask, 1.0, None)
    if method == "opd":
        config = OPDMethod(steps=1, rollouts_per_round=1, inner_epochs=1, batch_size=1, micro_batch_size=1,
                           max_new_tokens=2, discount=discount, clip_eps=clip_eps, eval_every=1, eval_max_new_tokens=1,
                           optimizer=Optimizer(lr=1, min_lr=0, weight_decay=0, grad_clip=1, schedule="constant",
                                               warmup_steps=0)).as_policy_gradient()
        advantage = advantages(rewards, mask, config.returns, config.gamma, config.length_normalized,
                               config.whiten_advantages)
        loss, _ = policy_loss(logp_new, logp_old, advantage, weights, mask, config.clip_eps)
    else:
        advantage = advantages(rewards, mask, "paper", 1.0, length_normalized, whiten)
        long_sum, _ = policy_loss(logp_new, logp_old, advantage, weights, mask, clip_eps)
        single_sum = losses.reverse_kl(student_logits, teacher_logits, mask, weights=weights, reduction="sum")
        loss = long_sum + single_sum
    return torch.cat([g.flatten() for g in torch.autograd.grad(loss / rollouts, (theta1, theta2))])


def error(method: str, rollouts: int, **settings) -> float:
    student, teacher = toy()
    return float((estimated_gradient(student, teacher, rollouts, method, **settings) - exact_gradient(student, teacher)).norm())


@pytest.mark.parametrize(("method", "settings"), [("opd", {"discount": 1.0}), ("minillm", {})],
                         ids=["opd-discount-1", "minillm-unmixed-unnormalised-unclipped"])
def test_the_estimator_is_unbiased(method, settings):
    """The error falls like 1/sqrt(N): within 4 / sqrt(N) of the exact gradient (a few standard errors of this toy)
    at every N, and 30x smaller at 1000x the rollouts."""
    errors = {n: error(method, n, **settings) for n in (1_000, 1_000_000)}
    scale = exact_gradient(*toy()).norm()
    for n, value in errors.items():
        assert value < 4 * scale / math.sqrt(n), (n, value)
    assert errors[1_000_000] < errors[1_000] / 10


@pytest.mark.parametrize(("method", "settings"), [
    ("opd", {"discount": 0.0}),
    ("minillm", {"teacher_mix": 0.2, "length_normalized": True, "whiten": True, "clip_eps": 0.2}),
], ids=["opd-discount-0", "minillm-mixed-normalised-whitened"])
def test_the_common_settings_are_biased(method, settings):
    """Negative control: these settings' error does not shrink with N, it levels off at their bias."""
    scale = exact_gradient(*toy()).norm()
    assert error(method, 1_000_000, **settings) > 20 * scale / math.sqrt(1_000_000)


if __name__ == "__main__":
    exact = exact_gradient(*toy()).norm()
    print(f"|exact gradient of KL(q || p)| = {exact:.4f}; relative error at 10^6 rollouts:")
    for label, method, settings in [
        ("OPD, discount 1", "opd", {"discount": 1.0}),
        ("OPD, discount 0 (TRL, tinker)", "opd", {"discount": 0.0}),
        ("MiniLLM, no mixing / normalisation / whitening / clipping", "minillm", {}),
        ("MiniLLM, teacher mix 0.2 only", "minillm", {"teacher_mix": 0.2}),
        ("MiniLLM, length normalisation only", "minillm", {"length_normalized": True}),
        ("MiniLLM, paper settings (mix 0.2, normalised, whitened, clip 0.2)", "minillm",
         {"teacher_mix": 0.2, "length_normalized": True, "whiten": True, "clip_eps": 0.2}),
    ]:
        print(f"  {label:70s} {error(method, 1_000_000, **settings) / exact:.3f}")
