"""Token-level divergences checked against a pure-python brute force (math.exp / math.log, float64, probabilities
mixed directly rather than in log space), finite differences of that brute force for gradients, and the
mathematical identities between them."""

import math
from collections.abc import Callable

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.losses import (
    DIVERGENCE_NAMES,
    divergence,
    forward_kl,
    jsd,
    reverse_kl,
    skew_forward_kl,
    skew_reverse_kl,
    teacher_cross_entropy,
    tvd,
)

# ---------------------------------------------------------------- brute-force references, one token at a time


def _softmax(row: list[float]) -> list[float]:
    top = max(row)
    exps = [math.exp(x - top) for x in row]
    total = sum(exps)
    return [e / total for e in exps]


def _kl(a: list[float], b: list[float]) -> float:
    return sum(a_v * math.log(a_v / b_v) for a_v, b_v in zip(a, b))


def _mix(a: list[float], b: list[float], weight_a: float) -> list[float]:
    return [weight_a * a_v + (1.0 - weight_a) * b_v for a_v, b_v in zip(a, b)]


def brute_forward_kl(p: list[float], q: list[float]) -> float:
    return _kl(p, q)


def brute_reverse_kl(p: list[float], q: list[float]) -> float:
    return _kl(q, p)


def brute_jsd(p: list[float], q: list[float], beta: float) -> float:
    m = _mix(p, q, beta)
    return beta * _kl(p, m) + (1.0 - beta) * _kl(q, m)


def brute_skew_forward_kl(p: list[float], q: list[float], alpha: float) -> float:
    return _kl(p, _mix(p, q, alpha))


def brute_skew_reverse_kl(p: list[float], q: list[float], alpha: float) -> float:
    return _kl(q, _mix(q, p, alpha))


def brute_tvd(p: list[float], q: list[float]) -> float:
    return 0.5 * sum(abs(p_v - q_v) for p_v, q_v in zip(p, q))


def brute_teacher_cross_entropy(p: list[float], q: list[float]) -> float:
    return -sum(p_v * math.log(q_v) for p_v, q_v in zip(p, q))


def brute_entropy(p: list[float]) -> float:
    return -sum(p_v * math.log(p_v) for p_v in p)


def brute_reduce(
    per_token: Callable[[list[float], list[float]], float],
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    mask: torch.Tensor,
    weights: torch.Tensor | None,
    reduction: str,
) -> float:
    student, teacher, mask_list = student_logits.double().tolist(), teacher_logits.double().tolist(), mask.tolist()
    weight_list = weights.tolist() if weights is not None else None
    total, count = 0.0, 0
    for b in range(len(student)):
        for t in range(len(student[b])):
            if not mask_list[b][t]:
                continue
            weight = weight_list[b][t] if weight_list is not None else 1.0
            total += weight * per_token(_softmax(teacher[b][t]), _softmax(student[b][t]))
            count += 1
    if reduction == "sum":
        return total
    return total / count if count else 0.0


# (id, function under test with the divergence's own parameter bound, brute-force per-token reference)
CASES = [
    ("forward_kl", lambda s, t, m, **kw: forward_kl(s, t, m, **kw), brute_forward_kl),
    ("reverse_kl", lambda s, t, m, **kw: reverse_kl(s, t, m, **kw), brute_reverse_kl),
    ("jsd_0.5", lambda s, t, m, **kw: jsd(s, t, m, 0.5, **kw), lambda p, q: brute_jsd(p, q, 0.5)),
    ("jsd_0.2", lambda s, t, m, **kw: jsd(s, t, m, 0.2, **kw), lambda p, q: brute_jsd(p, q, 0.2)),
    ("jsd_0.9", lambda s, t, m, **kw: jsd(s, t, m, 0.9, **kw), lambda p, q: brute_jsd(p, q, 0.9)),
    (
        "skew_forward_kl_0.1",
        lambda s, t, m, **kw: skew_forward_kl(s, t, m, 0.1, **kw),
        lambda p, q: brute_skew_forward_kl(p, q, 0.1),
    ),
    (
        "skew_forward_kl_0.7",
        lambda s, t, m, **kw: skew_forward_kl(s, t, m, 0.7, **kw),
        lambda p, q: brute_skew_forward_kl(p, q, 0.7),
    ),
    (
        "skew_reverse_kl_0.1",
        lambda s, t, m, **kw: skew_reverse_kl(s, t, m, 0.1, **kw),
        lambda p, q: brute_skew_reverse_kl(p, q, 0.1),
    ),
    (
        "skew_reverse_kl_0.7",
        lambda s, t, m, **kw: skew_reverse_kl(s, t, m, 0.7, **kw),
        lambda p, q: brute_skew_reverse_kl(p, q, 0.7),
    ),
    ("tvd", lambda s, t, m, **kw: tvd(s, t, m, **kw), brute_tvd),
    ("teacher_cross_entropy", lambda s, t, m, **kw: teacher_cross_entropy(s, t, m, **kw), brute_teacher_cross_entropy),
]
CASE_IDS = [case[0] for case in CASES]
# teacher_cross_entropy is not a divergence: at q = p it equals H(p), not 0 (tested separately).
DIVERGENCE_CASES = [case for case in CASES if case[0] != "teacher_cross_entropy"]
DIVERGENCE_CASE_IDS = [case[0] for case in DIVERGENCE_CASES]


def random_batch(
    seed: int, batch: int = 2, seq: int = 7, vocab: int = 11, scale: float = 3.0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    student = torch.randn(batch, seq, vocab, generator=generator) * scale
    teacher = torch.randn(batch, seq, vocab, generator=generator) * scale
    mask = torch.rand(batch, seq, generator=generator) < 0.7
    mask[0, 0] = True  # never empty here; the empty mask has its own test
    weights = torch.rand(batch, seq, generator=generator) * 2.0
    return student, teacher, mask, weights


# ---------------------------------------------------------------- values against the brute force


@pytest.mark.parametrize("case_id, loss_fn, brute_per_token", CASES, ids=CASE_IDS)
@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    batch=st.integers(1, 3),
    seq=st.integers(1, 6),
    vocab=st.integers(2, 7),
    scale=st.sampled_from([0.3, 3.0, 12.0]),
    chunk_size=st.integers(1, 7),
    reduction=st.sampled_from(["mean", "sum"]),
    weighted=st.booleans(),
    bool_mask=st.booleans(),
)
def test_matches_brute_force(
    case_id, loss_fn, brute_per_token, seed, batch, seq, vocab, scale, chunk_size, reduction, weighted, bool_mask
):
    student, teacher, mask, weights = random_batch(seed, batch, seq, vocab, scale)
    mask = mask if bool_mask else mask.float()
    weights = weights if weighted else None
    expected = brute_reduce(brute_per_token, student, teacher, mask, weights, reduction)
    actual = loss_fn(student, teacher, mask, weights=weights, reduction=reduction, chunk_size=chunk_size)
    assert actual.dtype == torch.float32 and actual.shape == ()
    assert actual.item() == pytest.approx(expected, rel=1e-4, abs=1e-5)


@pytest.mark.parametrize("name", DIVERGENCE_NAMES)
def test_dispatch_by_name_matches_brute_force(name):
    student, teacher, mask, weights = random_batch(seed=3)
    beta, alpha = 0.3, 0.2
    brute_per_token = {
        "forward_kl": brute_forward_kl,
        "reverse_kl": brute_reverse_kl,
        "jsd": lambda p, q: brute_jsd(p, q, beta),
        "skew_forward_kl": lambda p, q: brute_skew_forward_kl(p, q, alpha),
        "skew_reverse_kl": lambda p, q: brute_skew_reverse_kl(p, q, alpha),
        "tvd": brute_tvd,
        "teacher_cross_entropy": brute_teacher_cross_entropy,
    }[name]
    expected = brute_reduce(brute_per_token, student, teacher, mask, weights, "sum")
    actual = divergence(name, student, teacher, mask, beta=beta, alpha=alpha, weights=weights, reduction="sum")
    assert actual.item() == pytest.approx(expected, rel=1e-4, abs=1e-5)


def test_unknown_divergence_name_lists_valid_names():
    student, teacher, mask, _ = random_batch(seed=0)
    with pytest.raises(ValueError, match="forward_kl.*teacher_cross_entropy"):
        divergence("kl", student, teacher, mask)


# ---------------------------------------------------------------- gradients against finite differences


@pytest.mark.parametrize("case_id, loss_fn, brute_per_token", CASES, ids=CASE_IDS)
def test_gradients_match_finite_differences_of_brute_force(case_id, loss_fn, brute_per_token):
    student, teacher, mask, weights = random_batch(seed=11, batch=2, seq=3, vocab=4, scale=2.0)
    student.requires_grad_(True)
    teacher.requires_grad_(True)
    value = loss_fn(student, teacher, mask, weights=weights, chunk_size=2)
    value.backward()
    expected_value = brute_reduce(brute_per_token, student, teacher, mask, weights, "mean")
    assert value.item() == pytest.approx(expected_value, rel=1e-4)

    step = 1e-4
    for logits in (student, teacher):
        numeric = torch.zeros_like(logits, dtype=torch.float64)
        flat_logits = logits.detach().double().view(-1)  # a copy: the finite differences never touch the inputs
        for i in range(flat_logits.numel()):
            values_at = []
            for delta in (step, -step):
                shifted = flat_logits.clone()
                shifted[i] += delta
                shifted = shifted.view(logits.shape)
                args = (shifted, teacher) if logits is student else (student, shifted)
                values_at.append(brute_reduce(brute_per_token, *args, mask, weights, "mean"))
            numeric.view(-1)[i] = (values_at[0] - values_at[1]) / (2 * step)
        torch.testing.assert_close(logits.grad.double(), numeric, rtol=1e-3, atol=2e-5)


def test_forward_kl_gradient_is_q_minus_p():
    # d KL(p || q) / d student_logits = q - p per token, divided by the token count for the mean.
    student, teacher, _, _ = random_batch(seed=5, batch=1, seq=4)
    mask = torch.ones(1, 4)
    student.requires_grad_(True)
    forward_kl(student, teacher, mask).backward()
    expected = (torch.softmax(student.detach(), -1) - torch.softmax(teacher, -1)) / 4
    torch.testing.assert_close(student.grad, expected, rtol=1e-4, atol=1e-6)


# ---------------------------------------------------------------- properties


@pytest.mark.parametrize("case_id, loss_fn, brute_per_token", DIVERGENCE_CASES, ids=DIVERGENCE_CASE_IDS)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_nonnegative_and_zero_for_identical_inputs(case_id, loss_fn, brute_per_token, seed):
    student, teacher, mask, weights = random_batch(seed, scale=5.0)
    for reduction in ("mean", "sum"):
        assert loss_fn(student, teacher, mask, weights=weights, reduction=reduction).item() >= -1e-6
        # The same distribution given by shifted logits, so the zero does not come from identical tensors.
        same = loss_fn(student, student + 7.0, mask, weights=weights, reduction=reduction)
        assert abs(same.item()) < 1e-5


def test_teacher_cross_entropy_of_identical_inputs_is_teacher_entropy():
    student, _, mask, weights = random_batch(seed=4)
    expected = brute_reduce(lambda p, q: brute_entropy(p), student, student, mask, weights, "mean")
    actual = teacher_cross_entropy(student, student.clone(), mask, weights=weights)
    assert actual.item() == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("case_id, loss_fn, brute_per_token", CASES, ids=CASE_IDS)
def test_invariant_to_a_constant_added_to_a_row_of_logits(case_id, loss_fn, brute_per_token):
    student, teacher, mask, weights = random_batch(seed=6)
    generator = torch.Generator().manual_seed(60)
    row_shift = (torch.rand(*student.shape[:2], 1, generator=generator) - 0.5) * 100.0
    reference = loss_fn(student, teacher, mask, weights=weights)
    shifted_student = loss_fn(student + row_shift, teacher, mask, weights=weights)
    shifted_teacher = loss_fn(student, teacher - row_shift, mask, weights=weights)
    torch.testing.assert_close(shifted_student, reference, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(shifted_teacher, reference, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("case_id, loss_fn, brute_per_token", CASES, ids=CASE_IDS)
def test_masked_positions_have_no_effect(case_id, loss_fn, brute_per_token):
    student, teacher, mask, weights = random_batch(seed=7)
    generator = torch.Generator().manual_seed(70)
    is_padding = ~mask[..., None]
    # Different logits, and huge/NaN weights, at the masked positions only.
    other_student = torch.where(is_padding, torch.randn(student.shape, generator=generator) * 50.0, student)
    other_teacher = torch.where(is_padding, torch.randn(teacher.shape, generator=generator) * 50.0, teacher)
    other_weights = torch.where(mask, weights, torch.full_like(weights, float("nan")))

    results = []
    for s, t, w in ((student, teacher, weights), (other_student, other_teacher, other_weights)):
        s = s.clone().requires_grad_(True)
        t = t.clone().requires_grad_(True)
        value = loss_fn(s, t, mask, weights=w, chunk_size=3)
        value.backward()
        results.append((value, s.grad, t.grad))
    (value_a, student_grad_a, teacher_grad_a), (value_b, student_grad_b, teacher_grad_b) = results
    torch.testing.assert_close(value_b, value_a)
    torch.testing.assert_close(student_grad_b, student_grad_a)
    torch.testing.assert_close(teacher_grad_b, teacher_grad_a)
    assert torch.all(student_grad_b[~mask] == 0) and torch.all(teacher_grad_b[~mask] == 0)


@pytest.mark.parametrize("case_id, loss_fn, brute_per_token", CASES, ids=CASE_IDS)
def test_chunked_equals_unchunked_values_and_gradients(case_id, loss_fn, brute_per_token):
    student, teacher, mask, weights = random_batch(seed=8, batch=3, seq=9)
    mask[:, 6:] = False  # a trailing all-padding chunk, which the chunked path may skip

    def value_and_grads(chunk_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        s = student.clone().requires_grad_(True)
        t = teacher.clone().requires_grad_(True)
        value = loss_fn(s, t, mask, weights=weights, chunk_size=chunk_size)
        value.backward()
        return value, s.grad, t.grad

    unchunked = value_and_grads(chunk_size=9)
    for chunk_size in (1, 2, 4, 100):
        for chunked_part, unchunked_part in zip(value_and_grads(chunk_size), unchunked):
            torch.testing.assert_close(chunked_part, unchunked_part, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("case_id, loss_fn, brute_per_token", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_finite_gradients_for_extreme_logits(case_id, loss_fn, brute_per_token, dtype):
    generator = torch.Generator().manual_seed(9)
    # Every logit is +-1e4, so each softmax is one-hot-like and most log-probs are about -2e4.
    student = (torch.randint(0, 2, (2, 5, 13), generator=generator) * 2 - 1).to(dtype) * 1e4
    teacher = (torch.randint(0, 2, (2, 5, 13), generator=generator) * 2 - 1).to(dtype) * 1e4
    teacher[0, 0] = -1e4
    teacher[0, 0, 0] = 1e4  # the teacher is sure of token 0 ...
    student[0, 0] = -1e4
    student[0, 0, 1] = 1e4  # ... and the student of token 1: a 2e4-sized KL, which must still be finite
    student.requires_grad_(True)
    teacher.requires_grad_(True)
    mask = torch.ones(2, 5)
    value = loss_fn(student, teacher, mask, chunk_size=2)
    value.backward()
    assert torch.isfinite(value) and value.item() >= -1e-6
    assert torch.isfinite(student.grad).all() and torch.isfinite(teacher.grad).all()
    assert student.grad.dtype == dtype


def test_endpoint_identities():
    student, teacher, mask, weights = random_batch(seed=10)
    common = dict(weights=weights, reduction="sum")
    fkl = forward_kl(student, teacher, mask, **common)
    rkl = reverse_kl(student, teacher, mask, **common)
    torch.testing.assert_close(jsd(student, teacher, mask, 0.0, **common), fkl)
    torch.testing.assert_close(jsd(student, teacher, mask, 1.0, **common), rkl)
    torch.testing.assert_close(skew_forward_kl(student, teacher, mask, 0.0, **common), fkl)
    torch.testing.assert_close(skew_reverse_kl(student, teacher, mask, 0.0, **common), rkl)
    # Full skew makes the mixture the reference distribution itself.
    assert abs(skew_forward_kl(student, teacher, mask, 1.0, **common).item()) < 1e-5
    assert abs(skew_reverse_kl(student, teacher, mask, 1.0, **common).item()) < 1e-5


def test_teacher_cross_entropy_minus_forward_kl_is_teacher_entropy():
    student, teacher, mask, weights = random_batch(seed=12)
    expected = brute_reduce(lambda p, q: brute_entropy(p), student, teacher, mask, weights, "mean")
    difference = teacher_cross_entropy(student, teacher, mask, weights=weights) - forward_kl(
        student, teacher, mask, weights=weights
    )
    assert difference.item() == pytest.approx(expected, rel=1e-4)


@pytest.mark.parametrize("case_id, loss_fn, brute_per_token", CASES, ids=CASE_IDS)
def test_sum_divided_by_token_count_equals_mean(case_id, loss_fn, brute_per_token):
    student, teacher, mask, weights = random_batch(seed=13)
    total = loss_fn(student, teacher, mask, weights=weights, reduction="sum")
    mean = loss_fn(student, teacher, mask, weights=weights, reduction="mean")
    torch.testing.assert_close(total / mask.sum(), mean)


@pytest.mark.parametrize("case_id, loss_fn, brute_per_token", CASES, ids=CASE_IDS)
def test_empty_mask_gives_zero_and_zero_gradients(case_id, loss_fn, brute_per_token):
    student, teacher, _, weights = random_batch(seed=14)
    empty = torch.zeros(student.shape[:2], dtype=torch.bool)
    for reduction in ("mean", "sum"):
        s = student.clone().requires_grad_(True)
        value = loss_fn(s, teacher, empty, weights=weights, reduction=reduction, chunk_size=3)
        assert value.item() == 0.0
        value.backward()  # still part of the autograd graph
        assert torch.all(s.grad == 0)


def test_weights_are_constants():
    student, teacher, mask, weights = random_batch(seed=15)
    student.requires_grad_(True)
    weights.requires_grad_(True)
    reverse_kl(student, teacher, mask, weights=weights).backward()
    assert weights.grad is None
    assert student.grad is not None and student.grad.abs().sum() > 0


def test_no_float32_vocabulary_tensor_is_saved_for_backward():
    # Checkpointed chunks save only their (bf16) input logits; without checkpointing autograd would keep several
    # fp32 [B, chunk, V] tensors per chunk, i.e. the whole batch's fp32 softmax by the end of the forward.
    vocab = 97
    student = torch.randn(2, 8, vocab, dtype=torch.bfloat16, requires_grad=True)
    teacher = torch.randn(2, 8, vocab, dtype=torch.bfloat16, requires_grad=True)
    mask = torch.ones(2, 8)
    saved: list[torch.Tensor] = []

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        saved.append(tensor)
        return tensor

    for name in DIVERGENCE_NAMES:
        saved.clear()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            value = divergence(name, student, teacher, mask, chunk_size=3)
        vocabulary_sized = [tensor for tensor in saved if tensor.dim() == 3 and tensor.shape[-1] == vocab]
        assert vocabulary_sized, name  # the inputs themselves are saved
        assert all(tensor.dtype == torch.bfloat16 for tensor in vocabulary_sized), name
        value.backward()


def test_shape_mismatch_is_an_error():
    student, teacher, mask, _ = random_batch(seed=16)
    with pytest.raises(ValueError, match="tokenizer"):
        forward_kl(student, teacher[..., :-1], mask)
    with pytest.raises(ValueError):
        forward_kl(student, teacher, mask[:, :-1])
