"""MiniLLM loss parts against hand-computed examples (the arithmetic is written out next to each number)."""

import math
import statistics
import threading

import pytest
import torch

from pipeline.minillm_loss import (
    advantages,
    importance_weights,
    long_term_returns,
    per_token_rewards,
    policy_loss,
    whiten,
    whiten_padded,
)

# Two rows of different lengths: row 0 has 2 response tokens, then padding whose rewards (100) must never leak in.
REWARDS = torch.tensor([[2.0, 6.0, 100.0, 100.0], [1.0, -2.0, 4.0, 8.0]])
MASK = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]])

# ---------------------------------------------------------------- returns


def test_paper_returns_length_normalized():
    # R_t = mean of the strictly-future rewards, 0 for the last token (no future).
    # row 0 (T=2): t=0: 6/1 = 6;                t=1: 0
    # row 1 (T=4): t=0: (-2+4+8)/3 = 10/3;  t=1: (4+8)/2 = 6;  t=2: 8/1 = 8;  t=3: 0
    expected = torch.tensor([[6.0, 0.0, 0.0, 0.0], [10.0 / 3.0, 6.0, 8.0, 0.0]])
    actual = long_term_returns(REWARDS, MASK, "paper", gamma=0.5, length_normalized=True)
    torch.testing.assert_close(actual, expected)


def test_paper_returns_plain_sums():
    # row 0: t=0: 6;  t=1: 0.   row 1: t=0: -2+4+8 = 10;  t=1: 4+8 = 12;  t=2: 8;  t=3: 0
    expected = torch.tensor([[6.0, 0.0, 0.0, 0.0], [10.0, 12.0, 8.0, 0.0]])
    actual = long_term_returns(REWARDS, MASK, "paper", gamma=0.5, length_normalized=False)
    torch.testing.assert_close(actual, expected)


def test_discounted_returns_length_normalized():
    # gamma = 0.5, G_t = r_t + 0.5 G_{t+1}, then divided by the tokens left (T - t):
    # row 0: G_1 = 6;  G_0 = 2 + 0.5*6 = 5                      -> 5/2 = 2.5, 6/1 = 6
    # row 1: G_3 = 8;  G_2 = 4 + 0.5*8 = 8;  G_1 = -2 + 0.5*8 = 2;  G_0 = 1 + 0.5*2 = 2
    #                                                           -> 2/4 = 0.5, 2/3, 8/2 = 4, 8/1 = 8
    expected = torch.tensor([[2.5, 6.0, 0.0, 0.0], [0.5, 2.0 / 3.0, 4.0, 8.0]])
    actual = long_term_returns(REWARDS, MASK, "discounted", gamma=0.5, length_normalized=True)
    torch.testing.assert_close(actual, expected)


def test_discounted_returns_plain():
    # The G_t above, undivided.
    expected = torch.tensor([[5.0, 6.0, 0.0, 0.0], [2.0, 2.0, 8.0, 8.0]])
    actual = long_term_returns(REWARDS, MASK, "discounted", gamma=0.5, length_normalized=False)
    torch.testing.assert_close(actual, expected)


def test_undiscounted_returns_are_suffix_sums():
    # gamma = 1: row 0: 2+6 = 8, 6.   row 1: 1-2+4+8 = 11, -2+4+8 = 10, 4+8 = 12, 8
    expected = torch.tensor([[8.0, 6.0, 0.0, 0.0], [11.0, 10.0, 12.0, 8.0]])
    actual = long_term_returns(REWARDS, MASK, "discounted", gamma=1.0, length_normalized=False)
    torch.testing.assert_close(actual, expected)


def test_unknown_returns_form_is_an_error():
    with pytest.raises(ValueError, match="paper"):
        long_term_returns(REWARDS, MASK, "gae", gamma=0.5, length_normalized=True)


# ---------------------------------------------------------------- advantages


@pytest.mark.parametrize(
    "form, length_normalized, expected",
    [
        ("paper", True, [[6.0, 0.0, 0.0, 0.0], [10.0 / 3.0, 6.0, 8.0, 0.0]]),
        ("paper", False, [[6.0, 0.0, 0.0, 0.0], [10.0, 12.0, 8.0, 0.0]]),
        ("discounted", True, [[2.5, 6.0, 0.0, 0.0], [0.5, 2.0 / 3.0, 4.0, 8.0]]),
        ("discounted", False, [[5.0, 6.0, 0.0, 0.0], [2.0, 2.0, 8.0, 8.0]]),
    ],
)
def test_advantages_without_whitening_are_the_returns(form, length_normalized, expected):
    actual = advantages(REWARDS, MASK, form, 0.5, length_normalized, whiten_advantages=False)
    torch.testing.assert_close(actual, torch.tensor(expected))


def test_whitened_advantages():
    # Paper form, plain sums: the 6 real values are 6, 0 | 10, 12, 8, 0.
    # mean = 36/6 = 6; deviations 0, -6 | 4, 6, 2, -6; variance = (0+36+16+36+4+36)/6 = 128/6 = 64/3,
    # std = 8/sqrt(3), so each value is deviation * sqrt(3)/8.
    root3 = math.sqrt(3.0)
    expected = torch.tensor([[0.0, -0.75 * root3, 0.0, 0.0], [0.5 * root3, 0.75 * root3, 0.25 * root3, -0.75 * root3]])
    actual = advantages(REWARDS, MASK, "paper", 0.5, False, whiten_advantages=True)
    torch.testing.assert_close(actual, expected)


# ---------------------------------------------------------------- whiten


def test_whiten_has_zero_mean_unit_std_over_masked_entries_and_zero_padding():
    generator = torch.Generator().manual_seed(0)
    values = torch.randn(3, 6, generator=generator) * 4.0 + 2.5
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0], [1, 0, 0, 0, 0, 0]])
    values[mask == 0] = 1e6  # padding values must not enter the statistics

    whitened = whiten(values, mask)
    real = whitened[mask == 1].tolist()
    assert statistics.fmean(real) == pytest.approx(0.0, abs=1e-5)
    assert statistics.pstdev(real) == pytest.approx(1.0, abs=1e-5)
    assert torch.all(whitened[mask == 0] == 0)

    kept_mean = whiten(values, mask, shift_mean=False)[mask == 1].tolist()
    original_mean = statistics.fmean(values[mask == 1].tolist())
    assert statistics.fmean(kept_mean) == pytest.approx(original_mean, rel=1e-5)
    assert statistics.pstdev(kept_mean) == pytest.approx(1.0, abs=1e-5)


def test_whiten_hand_example():
    # Real values 1, 3 | 5: mean 3, variance (4+0+4)/3 = 8/3, std = sqrt(8/3).
    std = math.sqrt(8.0 / 3.0)
    actual = whiten(torch.tensor([[1.0, 3.0], [5.0, -7.0]]), torch.tensor([[1, 1], [1, 0]]))
    torch.testing.assert_close(actual, torch.tensor([[-2.0 / std, 0.0], [2.0 / std, 0.0]]))


# ---------------------------------------------------------------- importance weights

# A 3-token vocabulary; the sampled token y_t is token 0, 1 or 2 in turn.
TEACHER_PROBS = [0.5, 0.3, 0.2]
STUDENT_PROBS = [0.2, 0.5, 0.3]


def test_importance_weights_on_a_toy_distribution():
    # p~ = 0.2 p + 0.8 q = [0.1 + 0.16, 0.06 + 0.40, 0.04 + 0.24] = [0.26, 0.46, 0.28]   (sums to 1)
    # w = q / p~           = [0.2/0.26, 0.5/0.46, 0.3/0.28]
    expected = torch.tensor([[0.2 / 0.26, 0.5 / 0.46, 0.3 / 0.28]])
    logp_teacher = torch.tensor([TEACHER_PROBS]).log()
    logp_student = torch.tensor([STUDENT_PROBS]).log()
    actual = importance_weights(logp_student, logp_teacher, alpha=0.2, max_weight=None)
    torch.testing.assert_close(actual, expected)

    clipped = importance_weights(logp_student, logp_teacher, alpha=0.2, max_weight=1.0)
    torch.testing.assert_close(clipped, torch.tensor([[0.2 / 0.26, 1.0, 1.0]]))


def test_importance_weights_alpha_zero_is_exactly_one():
    logp_teacher = torch.tensor([[-0.1, -30.0, -2.0]])
    logp_student = torch.tensor([[-5.0, -0.01, -2.0]])
    assert torch.equal(importance_weights(logp_student, logp_teacher, 0.0, None), torch.ones(1, 3))


def test_importance_weights_are_bounded_and_detached():
    # A token the teacher never samples (p ~ e^-80): w -> q / ((1 - alpha) q) = 1 / 0.8 = 1.25.
    logp_teacher = torch.tensor([[-80.0]], requires_grad=True)
    logp_student = torch.tensor([[-0.1]], requires_grad=True)
    weights = importance_weights(logp_student, logp_teacher, alpha=0.2, max_weight=None)
    assert weights.item() == pytest.approx(1.25, rel=1e-6)
    assert not weights.requires_grad


# ---------------------------------------------------------------- rewards


def test_rewards_scale_clip_and_padding():
    logp_teacher = torch.tensor([[-1.0, -2.0, -0.5], [-3.0, -0.1, float("-inf")]])
    logp_student = torch.tensor([[-2.0, -1.0, -0.5], [-0.5, -4.0, 0.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    # log-ratios: -1+2 = 1, -2+1 = -1, 0 | -3+0.5 = -2.5, -0.1+4 = 3.9, (padding: -inf)
    torch.testing.assert_close(
        per_token_rewards(logp_teacher, logp_student, mask, scale=1.0, clip=None),
        torch.tensor([[1.0, -1.0, 0.0], [-2.5, 3.9, 0.0]]),
    )
    # Divided by 0.5: 2, -2, 0 | -5, 7.8
    torch.testing.assert_close(
        per_token_rewards(logp_teacher, logp_student, mask, scale=0.5, clip=None),
        torch.tensor([[2.0, -2.0, 0.0], [-5.0, 7.8, 0.0]]),
    )
    # ... then clipped to [-3, 3]: 2, -2, 0 | -3, 3
    torch.testing.assert_close(
        per_token_rewards(logp_teacher, logp_student, mask, scale=0.5, clip=3.0),
        torch.tensor([[2.0, -2.0, 0.0], [-3.0, 3.0, 0.0]]),
    )


# ---------------------------------------------------------------- policy loss

# eps = 0.2, so rho is clipped to [0.8, 1.2].  loss_t = max(-A rho, -A clip(rho)):
#   A= 1,   rho=1.1: max(-1.1, -1.1) = -1.1   inside the range                 d/d logp_new = -A rho = -1.1
#   A= 1,   rho=1.5: max(-1.5, -1.2) = -1.2   clipped                          0
#   A= 1,   rho=0.5: max(-0.5, -0.8) = -0.5   unclipped branch (pessimistic)   -0.5
#   A=-2,   rho=1.5: max( 3.0,  2.4) =  3.0   unclipped branch                  3.0   (rho = 1.25 * w, w = 1.2)
#   A=-2,   rho=0.5: max( 1.0,  1.6) =  1.6   clipped                          0
#   A=-1,   rho=0.9: max( 0.9,  0.9) =  0.9   inside                            0.9
#   A= 0.5, rho=1.0: max(-0.5, -0.5) = -0.5   inside                           -0.5
# sum = -1.1 - 1.2 - 0.5 + 3.0 + 1.6 + 0.9 - 0.5 = 2.2, clipped on 2 tokens.
# Row 0's last position is padding with extreme values that must not count.
POLICY_ADVANTAGES = torch.tensor([[1.0, 1.0, 1.0, 100.0], [-2.0, -2.0, -1.0, 0.5]])
POLICY_EXP_LOG_RATIO = torch.tensor([[1.1, 1.5, 0.5, 1.0], [1.25, 0.5, 0.9, 1.0]])
POLICY_WEIGHTS = torch.tensor([[1.0, 1.0, 1.0, 50.0], [1.2, 1.0, 1.0, 1.0]])
POLICY_MASK = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])


def _policy_inputs() -> tuple[torch.Tensor, torch.Tensor]:
    logp_old = torch.tensor([[-1.0, -2.0, -0.5, float("-inf")], [-3.0, -1.5, -0.7, -2.0]])
    logp_new = (logp_old + POLICY_EXP_LOG_RATIO.log()).detach()
    logp_new[0, 3] = 5.0
    return logp_new.requires_grad_(True), logp_old


def test_policy_loss_hand_computed():
    logp_new, logp_old = _policy_inputs()
    loss_sum, clip_count = policy_loss(logp_new, logp_old, POLICY_ADVANTAGES, POLICY_WEIGHTS, POLICY_MASK, 0.2)
    assert loss_sum.item() == pytest.approx(2.2, abs=1e-5)
    assert clip_count.item() == 2

    loss_sum.backward()
    expected_grad = torch.tensor([[-1.1, 0.0, -0.5, 0.0], [3.0, 0.0, 0.9, -0.5]])
    torch.testing.assert_close(logp_new.grad, expected_grad)


def test_policy_loss_per_token_values():
    # Each token alone, so that a right total cannot hide two wrong terms.
    logp_new, logp_old = _policy_inputs()
    expected = [[-1.1, -1.2, -0.5], [3.0, 1.6, 0.9, -0.5]]
    for b, row in enumerate(expected):
        for t, expected_loss in enumerate(row):
            only_this = torch.zeros_like(POLICY_MASK)
            only_this[b, t] = 1
            loss_sum, _ = policy_loss(logp_new, logp_old, POLICY_ADVANTAGES, POLICY_WEIGHTS, only_this, 0.2)
            assert loss_sum.item() == pytest.approx(expected_loss, abs=1e-5), (b, t)


def test_gradient_flows_only_through_the_new_log_probs():
    generator = torch.Generator().manual_seed(1)
    logp_old = (-torch.rand(2, 5, generator=generator) * 3.0).requires_grad_(True)
    logp_teacher = (logp_old.detach() + (torch.rand(2, 5, generator=generator) - 0.5) * 0.2).requires_grad_(True)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])

    rewards = per_token_rewards(logp_teacher, logp_old, mask, scale=1.0, clip=None)
    assert rewards.requires_grad  # the premise: without the detach, gradient would reach the rewards
    weights = importance_weights(logp_old, logp_teacher, alpha=0.2, max_weight=None)
    for form in ("paper", "discounted"):
        assert not advantages(rewards, mask, form, 0.95, True, whiten_advantages=True).requires_grad
    advantage = advantages(rewards, mask, "discounted", 0.95, True, whiten_advantages=True)

    logp_new = (logp_old.detach() + (torch.rand(2, 5, generator=generator) - 0.5) * 0.1).requires_grad_(True)
    rho = torch.exp(logp_new.detach() - logp_old.detach()) * weights
    assert torch.all((rho > 0.8) & (rho < 1.2))  # every token inside the clip range

    loss_sum, clip_count = policy_loss(logp_new, logp_old, advantage, weights, mask, clip_eps=0.2)
    loss_sum.backward()
    assert clip_count.item() == 0
    torch.testing.assert_close(logp_new.grad, torch.where(mask == 1, -advantage * rho, 0.0))
    assert logp_old.grad is None and logp_teacher.grad is None


def test_policy_loss_ignores_gradient_of_passed_advantages_and_weights():
    logp_new, logp_old = _policy_inputs()
    advantage = POLICY_ADVANTAGES.clone().requires_grad_(True)
    weights = POLICY_WEIGHTS.clone().requires_grad_(True)
    loss_sum, _ = policy_loss(logp_new, logp_old, advantage, weights, POLICY_MASK, 0.2)
    loss_sum.backward()
    assert advantage.grad is None and weights.grad is None


class TwoRankAllReduce:
    """An in-process all-reduce of floats between two threads, standing in for torch.distributed's."""

    def __init__(self):
        self.barrier, self.slots = threading.Barrier(2), [0.0, 0.0]

    def pooled_sum(self, rank: int):
        def pooled(value: float) -> float:
            self.slots[rank] = value
            self.barrier.wait()
            total = sum(self.slots)
            self.barrier.wait()  # nobody overwrites a slot before both ranks have read the total
            return total
        return pooled


def test_official_whitening_pools_padding_zeros_over_two_ranks_by_hand():
    # Rank 0's micro-batch: one response of 2 tokens at width 3 (one padding zero); rank 1's: 1 token, 2 zeros.
    # Pooled entries {1, 2, 0, 3, 0, 0}: mean 1, biased variance (0 + 1 + 1 + 4 + 1 + 1) / 6 = 4/3.
    micro_batches = [torch.tensor([[1.0, 2.0, 0.0]]), torch.tensor([[3.0, 0.0, 0.0]])]
    reduce, results = TwoRankAllReduce(), [None, None]

    def rank(r):
        results[r] = whiten_padded(micro_batches[r], reduce.pooled_sum(r))

    threads = [threading.Thread(target=rank, args=(r,)) for r in (0, 1)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    scale = (4 / 3 + 1e-8) ** -0.5
    torch.testing.assert_close(results[0], torch.tensor([[0.0, scale, -scale]]))
    torch.testing.assert_close(results[1], torch.tensor([[2 * scale, -scale, -scale]]))
    # One process: rank 0's entries alone, mean 1, variance 2/3.
    alone = (2 / 3 + 1e-8) ** -0.5
    torch.testing.assert_close(whiten_padded(micro_batches[0]), torch.tensor([[0.0, alone, -alone]]))
    # Ours, over real tokens only: mean 1.5, so the first token's advantage turns negative where the official one is 0.
    torch.testing.assert_close(whiten(micro_batches[0], torch.tensor([[1, 1, 0]])), torch.tensor([[-1.0, 1.0, 0.0]]),
                               atol=1e-6, rtol=0)
