"""Token-level divergences between the teacher and the student, over the vocabulary.

Notation (MiniLLM paper): at every position t, p = p(. | y_<t, x) = softmax(teacher_logits) is the teacher
and q = q_theta(. | y_<t, x) = softmax(student_logits) is the student; sums run over the vocabulary v.

    forward_kl             KL(p || q) = sum_v p(v) [log p(v) - log q(v)]                  (mode-covering)
    reverse_kl             KL(q || p) = sum_v q(v) [log q(v) - log p(v)]                  (MiniLLM's L_single)
    jsd (beta)             beta KL(p || m) + (1 - beta) KL(q || m),  m = beta p + (1 - beta) q      (GKD)
                           (its value tends to 0 at beta = 0 and 1; those ends are forward and reverse KL)
    skew_forward_kl (a)    KL(p || a p + (1 - a) q)                                        (DistiLLM)
    skew_reverse_kl (a)    KL(q || (1 - a) p + a q)                                        (DistiLLM)
    tvd                    (1/2) sum_v |p(v) - q(v)|
    teacher_cross_entropy  -sum_v p(v) log q(v) = KL(p || q) + H(p)                        (word-level KD term)

Every function reduces the per-token values d_t over the masked tokens of a [B, T] batch:
    reduction="sum":  sum_t mask_t w_t d_t             (the trainer divides by a global token count, spec §8)
    reduction="mean": that sum / sum_t mask_t          (0 for an empty mask)
with w_t an optional per-token weight, treated as a constant.

Memory: fp32 [B, T, V] log-probs of two models do not fit for real vocabularies, so the sequence is processed
in chunks, and each chunk is recomputed during backward (activation checkpointing) instead of saving its fp32
intermediates; only the input logits are kept for backward. fused_head_reverse_kl goes one step further for
MiniLLM's update: it starts from the last hidden states and runs both LM heads inside the recomputed chunks, so
not even the input logits exist for the whole sequence.
"""

import functools
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

# The names params.yaml may give (validated at load time); `divergence` below dispatches on them.
from pipeline.config import DIVERGENCE_NAMES  # noqa: F401  (re-exported: the losses' public vocabulary)

# Positions per chunk. With GPT-2's 50,257-token vocabulary and 8 rows, one fp32 [8, 64, V] tensor is ~100 MB,
# and a chunk holds a handful of them.
DEFAULT_CHUNK = 64


# Per-token divergences over the last (vocabulary) dimension, from fp32 log-probs: [..., V] -> [...].


def _forward_kl_per_token(log_q: Tensor, log_p: Tensor) -> Tensor:
    return (log_p.exp() * (log_p - log_q)).sum(-1)


def _reverse_kl_per_token(log_q: Tensor, log_p: Tensor) -> Tensor:
    return (log_q.exp() * (log_q - log_p)).sum(-1)


def _log_mixture(log_a: Tensor, log_b: Tensor, weight_a: float) -> Tensor:
    """log(weight_a * a + (1 - weight_a) * b) via logaddexp: summing tiny probabilities and taking the log
    would round to log(0) = -inf wherever both are below fp32's range."""
    if weight_a == 0.0:
        return log_b
    if weight_a == 1.0:
        return log_a
    return torch.logaddexp(log_a + math.log(weight_a), log_b + math.log1p(-weight_a))


def _jsd_per_token(log_q: Tensor, log_p: Tensor, beta: float) -> Tensor:
    log_m = _log_mixture(log_p, log_q, beta)
    kl_p_m = (log_p.exp() * (log_p - log_m)).sum(-1)
    kl_q_m = (log_q.exp() * (log_q - log_m)).sum(-1)
    return beta * kl_p_m + (1.0 - beta) * kl_q_m


def _skew_forward_kl_per_token(log_q: Tensor, log_p: Tensor, alpha: float) -> Tensor:
    log_m = _log_mixture(log_p, log_q, alpha)
    return (log_p.exp() * (log_p - log_m)).sum(-1)


def _skew_reverse_kl_per_token(log_q: Tensor, log_p: Tensor, alpha: float) -> Tensor:
    log_m = _log_mixture(log_q, log_p, alpha)
    return (log_q.exp() * (log_q - log_m)).sum(-1)


def _tvd_per_token(log_q: Tensor, log_p: Tensor) -> Tensor:
    return 0.5 * (log_p.exp() - log_q.exp()).abs().sum(-1)


def _teacher_cross_entropy_per_token(log_q: Tensor, log_p: Tensor) -> Tensor:
    return -(log_p.exp() * log_q).sum(-1)


def at_least_fp32(tensor: Tensor) -> Tensor:
    """fp16 and bf16 up to fp32 for the softmaxes; fp32 and float64 stay as they are."""
    return tensor.to(torch.promote_types(tensor.dtype, torch.float32))


def _chunk_divergence(
    per_token: Callable[[Tensor, Tensor], Tensor], student_chunk: Tensor, teacher_chunk: Tensor
) -> Tensor:
    log_q = F.log_softmax(at_least_fp32(student_chunk), dim=-1)
    log_p = F.log_softmax(at_least_fp32(teacher_chunk), dim=-1)
    return per_token(log_q, log_p)


def _reduce_chunked(
    per_token: Callable[[Tensor, Tensor], Tensor],
    student_logits: Tensor,
    teacher_logits: Tensor,
    mask: Tensor,
    weights: Tensor | None,
    reduction: str,
    chunk_size: int,
) -> Tensor:
    if student_logits.shape != teacher_logits.shape:
        # Fail instead of broadcasting: a vocabulary-size mismatch means the tokenizers differ (spec §8).
        raise ValueError(
            f"student logits {tuple(student_logits.shape)} != teacher logits {tuple(teacher_logits.shape)}; "
            "teacher and student must share one tokenizer"
        )
    if student_logits.dim() != 3 or mask.shape != student_logits.shape[:2]:
        raise ValueError(
            f"expected logits [B, T, V] and mask [B, T], got {tuple(student_logits.shape)} and {tuple(mask.shape)}"
        )
    if weights is not None and weights.shape != mask.shape:
        raise ValueError(f"weights {tuple(weights.shape)} must match mask {tuple(mask.shape)}")
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")

    mask = mask.to(torch.float32)
    # A select, not a product: weights on padding may be inf or NaN (e.g. importance weights of padding tokens).
    token_weights = mask if weights is None else torch.where(mask > 0, weights.detach().to(torch.float32), 0.0)
    use_checkpoint = torch.is_grad_enabled() and (student_logits.requires_grad or teacher_logits.requires_grad)

    batch_size, seq_len = mask.shape
    num_chunks = max(1, math.ceil(seq_len / chunk_size))
    # Right-padded batches often end in all-padding chunks; skipping them saves the softmax work, and their
    # gradient is zero anyway. One host sync (.tolist()) decides for all chunks. The first chunk is always computed
    # so that the result stays a function of the logits (backward() works) even when the whole mask is empty.
    padded_mask = F.pad(mask, (0, num_chunks * chunk_size - seq_len))
    chunk_has_tokens = padded_mask.view(batch_size, num_chunks, chunk_size).amax(dim=(0, 2)).gt(0).tolist()
    chunk_has_tokens[0] = True

    total = torch.zeros((), dtype=torch.float32, device=student_logits.device)
    for chunk_index, has_tokens in enumerate(chunk_has_tokens):
        if not has_tokens:
            continue
        start, end = chunk_index * chunk_size, (chunk_index + 1) * chunk_size
        student_chunk = student_logits[:, start:end]
        teacher_chunk = teacher_logits[:, start:end]
        if use_checkpoint:
            values = checkpoint(_chunk_divergence, per_token, student_chunk, teacher_chunk, use_reentrant=False)
        else:
            values = _chunk_divergence(per_token, student_chunk, teacher_chunk)
        total = total + (values * token_weights[:, start:end]).sum()

    if reduction == "sum":
        return total
    return total / mask.sum().clamp(min=1.0)


def forward_kl(
    student_logits: Tensor,
    teacher_logits: Tensor,
    mask: Tensor,
    *,
    weights: Tensor | None = None,
    reduction: str = "mean",
    chunk_size: int = DEFAULT_CHUNK,
) -> Tensor:
    """KL(p || q)."""
    return _reduce_chunked(_forward_kl_per_token, student_logits, teacher_logits, mask, weights, reduction, chunk_size)


def reverse_kl(
    student_logits: Tensor,
    teacher_logits: Tensor,
    mask: Tensor,
    *,
    weights: Tensor | None = None,
    reduction: str = "mean",
    chunk_size: int = DEFAULT_CHUNK,
) -> Tensor:
    """KL(q || p): MiniLLM's single-step term when called with weights=w_t and a detached teacher."""
    return _reduce_chunked(_reverse_kl_per_token, student_logits, teacher_logits, mask, weights, reduction, chunk_size)


def jsd(
    student_logits: Tensor,
    teacher_logits: Tensor,
    mask: Tensor,
    beta: float,
    *,
    weights: Tensor | None = None,
    reduction: str = "mean",
    chunk_size: int = DEFAULT_CHUNK,
) -> Tensor:
    """Generalised JSD(beta) of GKD. Its value tends to 0 at both ends (m becomes q or p), so, as in TRL,
    beta=0 and beta=1 are defined as the divergences the two ends stand for: forward and reverse KL."""
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"jsd beta must be in [0, 1], got {beta}")
    if beta == 0.0:
        per_token = _forward_kl_per_token
    elif beta == 1.0:
        per_token = _reverse_kl_per_token
    else:
        per_token = functools.partial(_jsd_per_token, beta=beta)
    return _reduce_chunked(per_token, student_logits, teacher_logits, mask, weights, reduction, chunk_size)


def skew_forward_kl(
    student_logits: Tensor,
    teacher_logits: Tensor,
    mask: Tensor,
    alpha: float,
    *,
    weights: Tensor | None = None,
    reduction: str = "mean",
    chunk_size: int = DEFAULT_CHUNK,
) -> Tensor:
    """KL(p || alpha p + (1 - alpha) q). DistiLLM's code returns the cross-entropy -sum p log m instead; the two
    differ by the constant H(p), so gradients are the same, and this one is 0 when q = p."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"skew alpha must be in [0, 1], got {alpha}")
    per_token = functools.partial(_skew_forward_kl_per_token, alpha=alpha)
    return _reduce_chunked(per_token, student_logits, teacher_logits, mask, weights, reduction, chunk_size)


def skew_reverse_kl(
    student_logits: Tensor,
    teacher_logits: Tensor,
    mask: Tensor,
    alpha: float,
    *,
    weights: Tensor | None = None,
    reduction: str = "mean",
    chunk_size: int = DEFAULT_CHUNK,
) -> Tensor:
    """KL(q || (1 - alpha) p + alpha q)."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"skew alpha must be in [0, 1], got {alpha}")
    per_token = functools.partial(_skew_reverse_kl_per_token, alpha=alpha)
    return _reduce_chunked(per_token, student_logits, teacher_logits, mask, weights, reduction, chunk_size)


def tvd(
    student_logits: Tensor,
    teacher_logits: Tensor,
    mask: Tensor,
    *,
    weights: Tensor | None = None,
    reduction: str = "mean",
    chunk_size: int = DEFAULT_CHUNK,
) -> Tensor:
    """Total variation distance (1/2) sum_v |p - q|."""
    return _reduce_chunked(_tvd_per_token, student_logits, teacher_logits, mask, weights, reduction, chunk_size)


def teacher_cross_entropy(
    student_logits: Tensor,
    teacher_logits: Tensor,
    mask: Tensor,
    *,
    weights: Tensor | None = None,
    reduction: str = "mean",
    chunk_size: int = DEFAULT_CHUNK,
) -> Tensor:
    """-sum_v p log q, the paper's word-level KD term; forward KL plus the teacher entropy, which has no gradient
    with respect to the student but makes the logged value differ from forward_kl."""
    return _reduce_chunked(
        _teacher_cross_entropy_per_token, student_logits, teacher_logits, mask, weights, reduction, chunk_size
    )


def _head_chunk(
    kl_grad: bool, student_hidden: Tensor, student_head: Tensor, teacher_hidden: Tensor, teacher_head: Tensor,
    tokens: Tensor,
) -> tuple[Tensor, Tensor, Tensor]:
    log_q = F.log_softmax(at_least_fp32(F.linear(student_hidden, student_head)), dim=-1)
    log_p = F.log_softmax(at_least_fp32(F.linear(teacher_hidden, teacher_head)), dim=-1)
    token_logprobs = log_q.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    with torch.no_grad():
        entropy = -(log_q.exp() * log_q).sum(-1)
    # A KL that no loss uses must not keep a graph: its recomputed intermediates, never unpacked by backward,
    # would stay alive for every chunk until backward ends (benchmarks/bench_logits.py, opd).
    with torch.set_grad_enabled(kl_grad and torch.is_grad_enabled()):
        kl = _reverse_kl_per_token(log_q, log_p)
    return token_logprobs, kl, entropy


def fused_head_reverse_kl(
    student_hidden: Tensor,
    student_head: Tensor,
    teacher_hidden: Tensor,
    teacher_head: Tensor,
    tokens: Tensor,
    mask: Tensor,
    *,
    weights: Tensor | None = None,
    kl_grad: bool = True,
    chunk_size: int = DEFAULT_CHUNK,
) -> tuple[Tensor, Tensor, Tensor]:
    """What MiniLLM's update needs from both models' logits, computed from their last hidden states [B, T, d] and
    LM-head weights [V, d] (bias-free heads, as GPT-2's), without ever holding [B, T, V] logits:

        log q(tokens_t)                      [B, T], differentiable (the PPO term's log-probs of the sampled tokens)
        sum_t w_t KL(q_t || p_t)             scalar, differentiable unless kl_grad is False (the single-step term;
                                             w = mask when None; OPD only logs it)
        sum_t mask_t H(q_t)                  scalar, no gradient (a diagnostic)

    The teacher's hidden states and head are constants. Each chunk of positions runs both heads and the softmaxes
    and is recomputed during backward, so memory holds one chunk's logits at a time instead of [B, T, V] fp32
    logits and log-probs of both models.
    """
    if not student_hidden.shape[:2] == teacher_hidden.shape[:2] == tokens.shape == mask.shape:
        raise ValueError(
            f"hidden states {tuple(student_hidden.shape)} / {tuple(teacher_hidden.shape)}, "
            f"tokens {tuple(tokens.shape)} "
            f"and mask {tuple(mask.shape)} must agree on [B, T]"
        )
    if student_head.shape[0] != teacher_head.shape[0]:
        raise ValueError(
            f"student head vocabulary {student_head.shape[0]} != teacher head vocabulary {teacher_head.shape[0]}; "
            "teacher and student must share one tokenizer"
        )
    if weights is not None and weights.shape != mask.shape:
        raise ValueError(f"weights {tuple(weights.shape)} must match mask {tuple(mask.shape)}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")

    mask = mask.to(torch.float32)
    token_weights = mask if weights is None else torch.where(mask > 0, weights.detach().to(torch.float32), 0.0)
    teacher_hidden, teacher_head = teacher_hidden.detach(), teacher_head.detach()
    use_checkpoint = torch.is_grad_enabled() and (student_hidden.requires_grad or student_head.requires_grad)
    token_logprobs, kl_sum, entropy_sum = [], student_hidden.new_zeros((), dtype=torch.float32), 0.0
    for start in range(0, tokens.shape[1], chunk_size):
        end = start + chunk_size
        inputs = (
            student_hidden[:, start:end], student_head, teacher_hidden[:, start:end], teacher_head, tokens[:, start:end]
        )
        if use_checkpoint:
            chunk_logprobs, kl, entropy = checkpoint(_head_chunk, kl_grad, *inputs, use_reentrant=False)
        else:
            chunk_logprobs, kl, entropy = _head_chunk(kl_grad, *inputs)
        token_logprobs.append(chunk_logprobs)
        kl_sum = kl_sum + (kl * token_weights[:, start:end]).sum()
        entropy_sum = entropy_sum + (entropy * mask[:, start:end]).sum()
    return torch.cat(token_logprobs, dim=1), kl_sum, entropy_sum


def per_token_divergence(name: str, beta: float = 0.5, alpha: float = 0.1) -> Callable[[Tensor, Tensor], Tensor]:
    """The per-token function d(log q, log p) of the divergence `name` (pipeline.config.DIVERGENCE_NAMES)."""
    match name:
        case "forward_kl":
            return _forward_kl_per_token
        case "reverse_kl":
            return _reverse_kl_per_token
        case "jsd":
            if not 0.0 <= beta <= 1.0:
                raise ValueError(f"jsd beta must be in [0, 1], got {beta}")
            # The ends are the divergences they stand for (the mixture's value tends to 0 there), as TRL defines them.
            return _forward_kl_per_token if beta == 0.0 else _reverse_kl_per_token if beta == 1.0 else functools.partial(
                _jsd_per_token, beta=beta)
        case "skew_forward_kl":
            return functools.partial(_skew_forward_kl_per_token, alpha=alpha)
        case "skew_reverse_kl":
            return functools.partial(_skew_reverse_kl_per_token, alpha=alpha)
        case "tvd":
            return _tvd_per_token
        case "teacher_cross_entropy":
            return _teacher_cross_entropy_per_token
    raise ValueError(f"unknown divergence {name!r}; valid names: {', '.join(DIVERGENCE_NAMES)}")


def _head_chunk_divergence(per_token, temperature: float, student_hidden: Tensor, student_head: Tensor,
                           teacher_hidden: Tensor, teacher_head: Tensor, tokens: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    log_q = F.log_softmax(at_least_fp32(F.linear(student_hidden, student_head)) / temperature, dim=-1)
    log_p = F.log_softmax(at_least_fp32(F.linear(teacher_hidden, teacher_head)) / temperature, dim=-1)
    with torch.no_grad():
        reverse = _reverse_kl_per_token(log_q, log_p)
        log_ratio = (log_p - log_q).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    return per_token(log_q, log_p), reverse, log_ratio


def fused_head_divergence(
    name: str,
    student_hidden: Tensor,
    student_head: Tensor,
    teacher_hidden: Tensor,
    teacher_head: Tensor,
    tokens: Tensor,
    mask: Tensor,
    *,
    beta: float = 0.5,
    alpha: float = 0.1,
    temperature: float = 1.0,
    chunk_size: int = DEFAULT_CHUNK,
) -> dict[str, Tensor]:
    """Sums over the masked positions of [B, T] of the divergence `name` between softmax(teacher logits / T) and
    softmax(student logits / T), from both models' last hidden states [B, T, d] and bias-free LM heads [V, d], a chunk
    of positions at a time, each recomputed during backward (as fused_head_reverse_kl): no [B, T, V] logits exist.

        divergence   sum_t mask_t d_t          differentiable in the student's hidden states and head
        reverse_kl   sum_t mask_t KL(q_t || p_t)              no gradient (a diagnostic)
        log_ratio    sum_t mask_t (log p - log q)(tokens_t)   no gradient: minus the reverse KL of sampled tokens
    """
    if not student_hidden.shape[:2] == teacher_hidden.shape[:2] == tokens.shape == mask.shape:
        raise ValueError(f"hidden states {tuple(student_hidden.shape)} / {tuple(teacher_hidden.shape)}, tokens "
                         f"{tuple(tokens.shape)} and mask {tuple(mask.shape)} must agree on [B, T]")
    if student_head.shape[0] != teacher_head.shape[0]:
        raise ValueError(f"student head vocabulary {student_head.shape[0]} != teacher head vocabulary "
                         f"{teacher_head.shape[0]}; teacher and student must share one tokenizer")
    if temperature <= 0.0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    per_token = per_token_divergence(name, beta, alpha)
    mask = mask.to(torch.float32)
    teacher_hidden, teacher_head = teacher_hidden.detach(), teacher_head.detach()
    use_checkpoint = torch.is_grad_enabled() and (student_hidden.requires_grad or student_head.requires_grad)
    zero = student_hidden.new_zeros((), dtype=torch.float32)
    sums = {"divergence": zero, "reverse_kl": zero, "log_ratio": zero}
    for start in range(0, tokens.shape[1], chunk_size):
        end = start + chunk_size
        inputs = (student_hidden[:, start:end], student_head, teacher_hidden[:, start:end], teacher_head, tokens[:, start:end])
        if use_checkpoint:
            values = checkpoint(_head_chunk_divergence, per_token, temperature, *inputs, use_reentrant=False)
        else:
            values = _head_chunk_divergence(per_token, temperature, *inputs)
        for key, value in zip(sums, values):
            sums[key] = sums[key] + (value * mask[:, start:end]).sum()
    return sums


def _head_chunk_kd(per_token, student_hidden: Tensor, student_head: Tensor, teacher_hidden: Tensor,
                   teacher_head: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
    log_q = F.log_softmax(at_least_fp32(F.linear(student_hidden, student_head)), dim=-1)
    log_p = F.log_softmax(at_least_fp32(F.linear(teacher_hidden, teacher_head)), dim=-1)
    return -log_q.gather(-1, targets.unsqueeze(-1)).squeeze(-1), per_token(log_q, log_p)


def fused_head_kd(
    name: str,
    student_hidden: Tensor,
    student_head: Tensor,
    teacher_hidden: Tensor,
    teacher_head: Tensor,
    targets: Tensor,
    mask: Tensor,
    *,
    beta: float = 0.5,
    alpha: float = 0.1,
    chunk_size: int = DEFAULT_CHUNK,
) -> dict[str, Tensor]:
    """Word-level KD's two sums over the masked positions of [B, T], from both models' last hidden states [B, T, d]
    and bias-free LM heads [V, d], a chunk of positions at a time, each recomputed during backward: no [B, T, V]
    logits exist (the full-logits form is F.cross_entropy and `divergence` with reduction "sum").

        ce           sum_t mask_t -log q(targets_t)      differentiable in the student's hidden states and head
        divergence   sum_t mask_t d(q_t, p_t)            the divergence `name`, differentiable likewise

    Chunks without a masked position (a left block of prompts) are skipped: their terms are 0. Targets at unmasked
    positions may be anything (-100 included)."""
    if not student_hidden.shape[:2] == teacher_hidden.shape[:2] == targets.shape == mask.shape:
        raise ValueError(f"hidden states {tuple(student_hidden.shape)} / {tuple(teacher_hidden.shape)}, targets "
                         f"{tuple(targets.shape)} and mask {tuple(mask.shape)} must agree on [B, T]")
    if student_head.shape[0] != teacher_head.shape[0]:
        raise ValueError(f"student head vocabulary {student_head.shape[0]} != teacher head vocabulary "
                         f"{teacher_head.shape[0]}; teacher and student must share one tokenizer")
    per_token = per_token_divergence(name, beta, alpha)
    mask = mask.to(torch.float32)
    targets = torch.where(mask > 0, targets, 0)
    teacher_hidden, teacher_head = teacher_hidden.detach(), teacher_head.detach()
    use_checkpoint = torch.is_grad_enabled() and (student_hidden.requires_grad or student_head.requires_grad)
    starts = range(0, targets.shape[1], chunk_size)
    # One host sync decides for all chunks; the first always runs, so the sums stay functions of the student.
    has_tokens = [index == 0 or flag for index, flag in enumerate(
        torch.stack([mask[:, start : start + chunk_size].any() for start in starts]).tolist())]
    ce = divergence_sum = student_hidden.new_zeros((), dtype=torch.float32)
    for start, computed in zip(starts, has_tokens):
        if not computed:
            continue
        end = start + chunk_size
        inputs = (student_hidden[:, start:end], student_head, teacher_hidden[:, start:end], teacher_head, targets[:, start:end])
        if use_checkpoint:
            token_ce, token_divergence = checkpoint(_head_chunk_kd, per_token, *inputs, use_reentrant=False)
        else:
            token_ce, token_divergence = _head_chunk_kd(per_token, *inputs)
        ce = ce + (token_ce * mask[:, start:end]).sum()
        divergence_sum = divergence_sum + (token_divergence * mask[:, start:end]).sum()
    return {"ce": ce, "divergence": divergence_sum}


def divergence(
    name: str,
    student_logits: Tensor,
    teacher_logits: Tensor,
    mask: Tensor,
    *,
    beta: float = 0.5,
    alpha: float = 0.1,
    weights: Tensor | None = None,
    reduction: str = "mean",
    chunk_size: int = DEFAULT_CHUNK,
) -> Tensor:
    """The divergence named by the `kd` method's `distill.kd.divergence` config value; beta is used by "jsd" only
    and alpha by the two skew divergences only."""
    match name:
        case "forward_kl":
            return forward_kl(
                student_logits, teacher_logits, mask, weights=weights, reduction=reduction, chunk_size=chunk_size
            )
        case "reverse_kl":
            return reverse_kl(
                student_logits, teacher_logits, mask, weights=weights, reduction=reduction, chunk_size=chunk_size
            )
        case "jsd":
            return jsd(
                student_logits, teacher_logits, mask, beta, weights=weights, reduction=reduction, chunk_size=chunk_size
            )
        case "skew_forward_kl":
            return skew_forward_kl(
                student_logits, teacher_logits, mask, alpha, weights=weights, reduction=reduction, chunk_size=chunk_size
            )
        case "skew_reverse_kl":
            return skew_reverse_kl(
                student_logits, teacher_logits, mask, alpha, weights=weights, reduction=reduction, chunk_size=chunk_size
            )
        case "tvd":
            return tvd(
                student_logits, teacher_logits, mask, weights=weights, reduction=reduction, chunk_size=chunk_size
            )
        case "teacher_cross_entropy":
            return teacher_cross_entropy(
                student_logits, teacher_logits, mask, weights=weights, reduction=reduction, chunk_size=chunk_size
            )
    raise ValueError(f"unknown divergence {name!r}; valid names: {', '.join(DIVERGENCE_NAMES)}")
