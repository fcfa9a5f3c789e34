"""The parts of MiniLLM's policy-gradient objective (Gu et al. 2023, §2.2; spec §4).

Responses y are sampled from the teacher-mixed policy p~ = alpha p + (1 - alpha) q_old, where p is the teacher,
q_old the student that sampled them and q_theta the student being updated. Every tensor is [B, T] over response
positions, t = 0 .. T_i - 1 for a row of length T_i (right padding after that, mask 0).

    w_t   = q_old(y_t) / p~(y_t)                                    importance_weights
    r_t   = log p(y_t) - log q_old(y_t)                             per_token_rewards
    R_t   = 1/(T_i - t - 1) sum_{t' > t} r_t'          (paper)      long_term_returns
    G_t   = sum_{t' >= t} gamma^(t' - t) r_t' / (T_i - t)  (code)   long_term_returns
    A_t   = R_t or G_t, optionally whitened, detached               advantages
    rho_t = exp(log q_theta(y_t) - log q_old(y_t)) w_t
    L_long = sum_t max(-A_t rho_t, -A_t clip(rho_t, 1 - eps, 1 + eps))                policy_loss

The full loss is L = L_single + L_long + L_PT. The single-step part is the exact expectation of the current
token's reward under q_theta, a per-token reverse KL over the vocabulary, weighted by w_t (paper; the official code
uses w_t = 1 there, single_step_weighted: false):

    L_single = sum_t w_t KL(q_theta(. | y_<t, x) || p(. | y_<t, x))
             = losses.reverse_kl(student_logits, teacher_logits.detach(), mask, weights=w, reduction="sum")

Because L_single already accounts for r_t exactly, the paper's R_t sums strictly-future rewards only; the
official code's discounted G_t includes r_t. L_PT is the language-modelling loss on a pre-training batch.
All losses here are sums over tokens: the trainer divides by a global token count (spec §8).
"""

import math

import torch
import torch.nn.functional as F
from torch import Tensor


def importance_weights(
    logp_student_old: Tensor, logp_teacher: Tensor, alpha: float, max_weight: float | None
) -> Tensor:
    """w_t = q_old(y_t) / (alpha p(y_t) + (1 - alpha) q_old(y_t)), a constant of the update (detached).
    w_t <= 1/(1 - alpha) by construction; max_weight clips it further."""
    if not 0.0 <= alpha < 1.0:
        raise ValueError(f"teacher mixing alpha must be in [0, 1), got {alpha}")
    logp_student_old = logp_student_old.detach()
    logp_teacher = logp_teacher.detach()
    if alpha == 0.0:
        # Pure student sampling needs no correction; log(alpha) below would be -inf.
        return torch.ones_like(logp_student_old)
    # log p~ via logaddexp: the probabilities of sampled tokens can be far below fp32's smallest normal number.
    logp_mixture = torch.logaddexp(logp_teacher + math.log(alpha), logp_student_old + math.log1p(-alpha))
    weights = torch.exp(logp_student_old - logp_mixture)
    if max_weight is not None:
        weights = weights.clamp(max=max_weight)
    return weights


def per_token_rewards(
    logp_teacher: Tensor, logp_student_old: Tensor, mask: Tensor, scale: float, clip: float | None
) -> Tensor:
    """r_t = (log p(y_t) - log q_old(y_t)) / scale, clipped to [-clip, clip], 0 on padding."""
    rewards = (logp_teacher - logp_student_old) / scale
    if clip is not None:
        rewards = rewards.clamp(min=-clip, max=clip)
    return torch.where(mask > 0, rewards, 0.0)


def _reverse_cumsum(values: Tensor) -> Tensor:
    """out[:, t] = sum_{t' >= t} values[:, t']."""
    return values.flip(1).cumsum(1).flip(1)


def long_term_returns(rewards: Tensor, mask: Tensor, form: str, gamma: float, length_normalized: bool) -> Tensor:
    """Paper: (mean or sum of) strictly-future rewards. Code: discounted return from t on, divided by the number of
    remaining tokens when length_normalized. 0 on padding."""
    is_token = mask > 0
    rewards = torch.where(is_token, rewards, 0.0)  # padding rewards must never reach a return
    tokens_from_t = _reverse_cumsum(is_token.to(rewards.dtype))  # T_i - t on real tokens
    if form == "paper":
        future_sums = F.pad(_reverse_cumsum(rewards)[:, 1:], (0, 1))  # sum_{t' > t} r_t'
        if length_normalized:
            # The last token has no future: its sum is 0 and the clamp only avoids 0/0.
            returns = future_sums / (tokens_from_t - 1).clamp(min=1)
        else:
            returns = future_sums
    elif form == "discounted":
        running = torch.zeros_like(rewards[:, 0])
        returns_reversed = []
        for t in reversed(range(rewards.shape[1])):
            running = rewards[:, t] + gamma * running
            returns_reversed.append(running)
        returns = torch.stack(returns_reversed[::-1], dim=1)
        if length_normalized:
            returns = returns / tokens_from_t.clamp(min=1)
    else:
        raise ValueError(f"unknown returns form {form!r}; valid forms: 'paper', 'discounted'")
    return torch.where(is_token, returns, 0.0)


def whiten(values: Tensor, mask: Tensor, shift_mean: bool = True) -> Tensor:
    """(x - mean) / (std + 1e-8) over the masked entries, 0 on padding. shift_mean=False adds the mean back, so
    only the spread is normalised (the trlx/TRL convention)."""
    is_token = mask > 0
    values = torch.where(is_token, values, 0.0)
    count = is_token.sum().clamp(min=1)
    mean = values.sum() / count
    variance = torch.where(is_token, (values - mean) ** 2, 0.0).sum() / count
    whitened = (values - mean) / (variance.sqrt() + 1e-8)
    if not shift_mean:
        whitened = whitened + mean
    return torch.where(is_token, whitened, 0.0)


def whiten_padded(values: Tensor, pooled_sum=lambda total: total) -> Tensor:
    """The official code's whitening (LMOps minillm/utils.py `whiten`, called by losses.py on every micro-batch):
    (x - mean) * rsqrt(var + 1e-8) over every entry of the padded [B, T] tensor, padding zeros included, with the
    mean and the biased variance pooled over data-parallel ranks. `pooled_sum` sums a float over the ranks (identity
    on one process). The official runs always have torch.distributed initialised, hence the pooled, biased branch.
    Padding entries come out non-zero; the policy loss masks them."""
    count = pooled_sum(float(values.numel()))
    mean = pooled_sum(float(values.sum())) / count
    variance = pooled_sum(float(((values - mean) ** 2).sum())) / count
    return (values - mean) * (variance + 1e-8) ** -0.5


def advantages(
    rewards: Tensor, mask: Tensor, form: str, gamma: float, length_normalized: bool, whiten_advantages: bool
) -> Tensor:
    """The long-term advantage A_t. Detached: it is a constant that multiplies the ratio (spec §8)."""
    returns = long_term_returns(rewards.detach(), mask, form, gamma, length_normalized)
    if whiten_advantages:
        returns = whiten(returns, mask)
    return returns


def policy_loss(
    logp_student_new: Tensor,
    logp_student_old: Tensor,
    advantages: Tensor,
    weights: Tensor,
    mask: Tensor,
    clip_eps: float,
) -> tuple[Tensor, Tensor]:
    """PPO clipped surrogate of L_long. Returns (sum of loss_t over real tokens, number of real tokens where the
    clipped branch was taken). Gradient flows only to logp_student_new."""
    is_token = mask > 0
    # Padding may hold arbitrary log-probs (even -inf): select before exp so that neither the values nor the
    # gradients see them, and padding contributes exactly 0 (A = 0 there).
    log_ratio = torch.where(is_token, logp_student_new - logp_student_old.detach(), 0.0)
    ratio = torch.exp(log_ratio) * torch.where(is_token, weights.detach(), 1.0)
    advantages = torch.where(is_token, advantages.detach(), 0.0)
    loss_unclipped = -advantages * ratio
    loss_clipped = -advantages * ratio.clamp(1.0 - clip_eps, 1.0 + clip_eps)
    clip_count = (loss_clipped > loss_unclipped).sum()
    return torch.maximum(loss_unclipped, loss_clipped).sum(), clip_count
